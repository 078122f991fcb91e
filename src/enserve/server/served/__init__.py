"""served"""
